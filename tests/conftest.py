import os

# Tests pin their own threads; keep spawned ranks from oversubscribing 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
