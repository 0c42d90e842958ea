"""Public ops: argument checks, backend dispatch, and the autograd and fake (meta)
registrations of the compiled operators. One module per op family."""
