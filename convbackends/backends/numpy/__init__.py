"""numpy implementations of the ops: strided views feed BLAS GEMMs."""
