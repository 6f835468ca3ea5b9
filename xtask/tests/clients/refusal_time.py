# Connects to HOST:PORT COUNT times; prints "refused" and how many
# milliseconds the refusal took, or "connected".
import socket
import sys
import time

host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for attempt in range(count):
    started = time.monotonic()
    try:
        socket.create_connection((host, port), timeout=5)
        print("connected")
    except ConnectionRefusedError:
        print("refused", round((time.monotonic() - started) * 1000, 3))
