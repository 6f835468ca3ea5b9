# COUNT UDP sockets one after another, each connected to HOST:PORT, sending
# one byte and closed; prints "done".
import socket
import sys

host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, port))
    s.send(b"x")
    s.close()
print("done")
