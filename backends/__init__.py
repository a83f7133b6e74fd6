"""Model backends behind one interface (`backends.base.Backend`), and the weights they load."""
