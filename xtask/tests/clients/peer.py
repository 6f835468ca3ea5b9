# One HTTP/1.0 request to HOST:PORT; prints the socket's peer as
# getpeername() shows it and the body the server answered.
import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=2)
s.sendall(b"GET / HTTP/1.0\r\n\r\n")
body = s.recv(4096).split(b"\r\n\r\n", 1)[1].strip().decode()
print(*s.getpeername(), body)
