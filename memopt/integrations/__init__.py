"""memopt beside other libraries' training loops (``memopt.integrations.hf``: HF Trainer)."""
