/* Local-only stub of libcuda.so.1 so that vllm/_C_stable_libtorch.abi3.so can be dlopen'ed
   on a machine without an NVIDIA driver. Every entry point reports CUDA_ERROR_NO_DEVICE. */
int cuGetProcAddress_v2(void){return 100;}
int cuPointerGetAttribute(void){return 100;}
int cuTensorMapEncodeTiled(void){return 100;}
int cuInit(void){return 100;}
int cuDriverGetVersion(int *v){if(v)*v=0;return 100;}
int cuDeviceGetCount(int *c){if(c)*c=0;return 100;}
