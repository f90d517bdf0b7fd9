"""The chip side of a PMGD job: output stage and job, shared by the engine and the broadcaster."""
