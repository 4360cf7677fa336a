"""Code shared by the fedtune server and client; imports no Flower app code."""
