# Connects 2,000 UDP sockets at once to port 53 of addresses from FIRST on,
# STEP apart (modulo 10,000), and asks each for its peer twice. UDP
# connect() sends nothing, so nothing needs to answer.
import ipaddress
import resource
import socket
import sys

first, step = sys.argv[1], int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
base = int(ipaddress.ip_address(first))
socks = []
for i in range(2000):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((str(ipaddress.ip_address(base + (i * step) % 10000)), 53))
    socks.append(s)
for s in socks * 2:
    s.getpeername()
