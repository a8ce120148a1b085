"""The ops, one module each: the op object (prepared once per backend and device) and its functional form."""
