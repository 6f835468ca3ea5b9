# One datagram from a connected UDP socket to HOST:PORT; prints whether it
# was answered, refused (an ICMP port unreachable) or timed out.
import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect((host, port))
s.send(b"anyone?")
try:
    s.recv(100)
    print("answered")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timed out")
