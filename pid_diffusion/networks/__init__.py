"""The networks a teacher or a student is made of: one module per family (`edm`: EDM's, Karras et al. 2022)."""
