"""The daemons: gRPC servicers and process lifecycle around the engine."""
