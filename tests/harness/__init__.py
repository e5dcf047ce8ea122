"""Helpers shared by the serving tests and `benchmarks/load_test.py`.

`server`: start `vllm-elastic serve`, wait for health, read /metrics, measure its memory;
`workload`, `hostile`, `client`, `reference`, `load`, `report`: the load test's request
mix, hostile cases, HTTP clients, engine-core references, run and table.
"""
