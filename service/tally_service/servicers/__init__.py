"""gRPC servicers: validate the request, call a read (reads.py) or a money function, convert."""
