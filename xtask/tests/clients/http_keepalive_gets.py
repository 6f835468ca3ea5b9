# `count` HTTP GETs of "/" to host:port over one keep-alive connection;
# prints how many answered 200. What is measured is the datapath's cost per
# packet of a flow already running.
# Arguments: host (IPv4 or IPv6), port, count.
import http.client
import sys

host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conn = http.client.HTTPConnection(host, port, timeout=5)
ok = 0
for _ in range(count):
    conn.request("GET", "/")
    answer = conn.getresponse()
    answer.read()
    ok += answer.status == 200
print(ok)
