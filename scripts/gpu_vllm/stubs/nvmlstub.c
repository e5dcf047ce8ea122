/* Local-only fake libnvidia-ml.so.1: one "NVIDIA H200" (sm_90, 143771 MiB), so that vLLM's
   NvmlCudaPlatform answers device queries on a machine without a GPU. */
#include <string.h>
typedef struct { unsigned long long total, free, used; } mem_t;
int nvmlInitWithFlags(unsigned f){return 0;}
int nvmlInit_v2(void){return 0;}
int nvmlInit(void){return 0;}
int nvmlShutdown(void){return 0;}
int nvmlDeviceGetCount_v2(unsigned *c){*c=1;return 0;}
int nvmlDeviceGetCount(unsigned *c){*c=1;return 0;}
int nvmlDeviceGetHandleByIndex_v2(unsigned i, void **h){if(i>0)return 2;*h=(void*)0x1000;return 0;}
int nvmlDeviceGetHandleByIndex(unsigned i, void **h){return nvmlDeviceGetHandleByIndex_v2(i,h);}
int nvmlDeviceGetHandleByUUID(const char *u, void **h){*h=(void*)0x1000;return 0;}
int nvmlDeviceGetIndex(void *h, unsigned *i){*i=0;return 0;}
int nvmlDeviceGetCudaComputeCapability(void *h, int *ma, int *mi){*ma=9;*mi=0;return 0;}
int nvmlDeviceGetName(void *h, char *n, unsigned l){strncpy(n,"NVIDIA H200",l);return 0;}
int nvmlDeviceGetUUID(void *h, char *n, unsigned l){strncpy(n,"GPU-00000000-0000-0000-0000-000000000000",l);return 0;}
int nvmlDeviceGetMemoryInfo(void *h, mem_t *m){m->total=143771ULL<<20;m->free=m->total;m->used=0;return 0;}
int nvmlDeviceGetP2PStatus(void *a, void *b, int idx, int *st){*st=0;return 0;}
int nvmlSystemGetDriverVersion(char *v, unsigned l){strncpy(v,"580.159.04",l);return 0;}
int nvmlSystemGetCudaDriverVersion(int *v){*v=13000;return 0;}
int nvmlSystemGetCudaDriverVersion_v2(int *v){*v=13000;return 0;}
int nvmlDeviceGetNumaNodeId(void *h, unsigned *n){return 3;}
int nvmlDeviceGetCpuAffinity(void *h, unsigned n, unsigned long *s){return 3;}
int nvmlDeviceGetPciInfo_v3(void *h, void *p){return 3;}
const char *nvmlErrorString(int r){return "fake nvml: not supported";}
