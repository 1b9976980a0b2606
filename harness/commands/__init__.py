"""One module per `bench` verb, and the option handling they share; commands never import each other."""
