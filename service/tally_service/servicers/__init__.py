"""gRPC servicers: validate the request, call the store or a money function, convert."""
