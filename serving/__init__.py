"""BentoML prediction service, traffic store and the online adaptation worker."""
