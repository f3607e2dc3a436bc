"""From images to results: the caption loop, the feature store and `prepare`, which fills it."""
