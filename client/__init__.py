"""fedtune client: ClientApp, local training and privacy."""
