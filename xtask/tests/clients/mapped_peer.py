# One HTTP/1.0 request from an AF_INET6 socket that also speaks IPv4
# (IPV6_V6ONLY off) to [HOST]:PORT, HOST an IPv4-mapped address such as
# ::ffff:10.96.0.30; prints the socket's peer as getpeername() shows it and
# the body the server answered.
import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.settimeout(2)
s.connect((host, port))
s.sendall(b"GET / HTTP/1.0\r\n\r\n")
peer = s.getpeername()
response = b""
while chunk := s.recv(4096):
    response += chunk
body = response.split(b"\r\n\r\n", 1)[1].strip().decode()
print(peer[0], peer[1], body)
