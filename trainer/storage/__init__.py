"""How checkpoint files are written: atomically (temporary name, fsync, rename), hashed as they are written,
made durable on a helper thread (``atomic.py``); safetensors straight from the tensors
(``serialization.py``); the host-memory snapshot of a background save (``staging.py``)."""
