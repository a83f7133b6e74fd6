"""Model backends behind one interface (`base.Backend`), the kinds a tier may name and the tier
schema (`registry`), and the weights the embedded backend loads. The lowest layer: it imports
nothing else of GreenRoute (docs/architecture.md)."""
