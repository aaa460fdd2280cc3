"""The networks, named like the checkpoints: a module's attribute path is its key in the original file."""
