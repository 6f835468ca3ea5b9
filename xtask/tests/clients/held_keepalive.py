# A keep-alive HTTP connection to HOST:PORT: prints who answered its first
# request, then, for each line on stdin, who answered the next one on the
# same connection; ends with stdin.
import http.client
import sys

host, port = sys.argv[1], int(sys.argv[2])
c = http.client.HTTPConnection(host, port, timeout=5)
while True:
    c.request("GET", "/held")
    print(c.getresponse().read().decode().strip(), flush=True)
    if not sys.stdin.readline():
        break
