# A keep-alive HTTP connection to HOST:80 that landed on pod-a; prints
# "pod-a" once it has one. Then, for each line on stdin, one more request
# on it, or, once that failed, the errno and the answer on a new one.
import errno
import http.client
import sys

host = sys.argv[1]


def get(c):
    c.request("GET", "/held")
    return c.getresponse().read().decode().strip()


for _ in range(100):
    held = http.client.HTTPConnection(host, 80, timeout=3)
    if get(held) == "pod-a":
        break
    held.close()
else:
    sys.exit("the Service never chose pod-a")
print("pod-a", flush=True)
for _ in sys.stdin:
    try:
        print(get(held), flush=True)
    except OSError as error:
        held = http.client.HTTPConnection(host, 80, timeout=3)
        print(errno.errorcode.get(error.errno, "closed"), get(held), flush=True)
