# One datagram from a connected UDP socket to [HOST]:PORT over IPv6, as
# udp_refusal.py sends it, while the ICMPv6 errors arriving on DEVICE are
# captured and their checksums checked here: the kernel takes a checksum
# a veth marked as verified on trust, so only a check of the bytes shows a
# wrong one. Prints "refused", "answered" or "timed out", then, for each
# ICMPv6 error seen, "icmp6 <type> checksum ok" or "... bad".
import socket
import struct
import sys
import time

host, port, device = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ETH_P_IPV6 = 0x86DD
capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IPV6))
capture.bind((device, 0))
capture.settimeout(0.2)

s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
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


def checksum_ok(ip):
    length = struct.unpack("!H", ip[4:6])[0]
    message = ip[40 : 40 + length]
    pseudo = ip[8:40] + struct.pack("!IxxxB", length, 58)
    data = pseudo + message
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


deadline = time.monotonic() + 1
while time.monotonic() < deadline:
    try:
        frame = capture.recv(65535)
    except TimeoutError:
        continue
    ip = frame[14:]
    # ICMPv6 right after the fixed header, an error (types below 128).
    if len(ip) < 48 or ip[6] != 58 or ip[40] >= 128:
        continue
    verdict = "ok" if checksum_ok(ip) else "bad"
    print(f"icmp6 {ip[40]} checksum {verdict}")
