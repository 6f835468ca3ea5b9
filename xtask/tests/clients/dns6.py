# Asks the DNS Service at [HOST]:53 for whoami.lab TXT from a connected
# AF_INET6 UDP socket (connect/send/recvfrom and getpeername). Prints who
# the reply came from, the socket's peer and which of NAMES answered.
import socket
import struct
import sys

host, names = sys.argv[1], sys.argv[2:]
query = struct.pack(">6H", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x06whoami\x03lab\x00" + struct.pack(">2H", 16, 1)
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect((host, 53))
s.send(query)
reply, sender = s.recvfrom(512)
peer = s.getpeername()
answered = [name for name in names if name.encode() in reply]
print(sender[0], sender[1], peer[0], peer[1], *answered)
