# A keep-alive HTTP connection to HOST:PORT: prints who answered its first
# request, waits for a line on stdin, and prints who answered the second.
import http.client
import sys

host, port = sys.argv[1], int(sys.argv[2])
c = http.client.HTTPConnection(host, port, timeout=5)
for _ in range(2):
    c.request("GET", "/held")
    print(c.getresponse().read().decode().strip(), flush=True)
    sys.stdin.readline()
