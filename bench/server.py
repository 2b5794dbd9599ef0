"""The Tally server under test: ``python -m tally_service serve`` as a subprocess on a
free loopback port, its log in a file."""

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    target: str
    process: subprocess.Popen[bytes]
    log_path: Path
    shutdown_grace_seconds: float

    def stop(self) -> int:
        """SIGTERM, wait for the graceful shutdown, SIGKILL if it overruns; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(self.shutdown_grace_seconds + 15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            return -signal.SIGKILL

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_serving(target: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"server at {target} did not become SERVING within {timeout}s")


def start_server(
    database_url: str,
    log_path: Path,
    *,
    pool_size: int,
    shutdown_grace_seconds: float = 5.0,
) -> ServerProcess:
    target = f"{HOST}:{free_port()}"
    env = {
        **os.environ,
        "TALLY_DATABASE_URL": database_url,
        "TALLY_LISTEN_ADDRESS": target,
        # Metrics stay on, as in production, on a port of their own.
        "TALLY_METRICS_ADDRESS": f"{HOST}:{free_port()}",
        "TALLY_DB_POOL_SIZE": str(pool_size),
        "TALLY_SHUTDOWN_GRACE_SECONDS": str(shutdown_grace_seconds),
    }
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "tally_service", "serve"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
    server = ServerProcess(target, process, log_path, shutdown_grace_seconds)
    try:
        wait_serving(target, process)
    except BaseException:
        server.process.kill()
        server.process.wait(10)
        print(server.log(), file=sys.stderr)
        raise
    return server
