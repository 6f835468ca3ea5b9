# An HTTP server on one IPv6 address, as the lab's nginx pods serve over
# IPv4: "/" answers with the pod's name, "/peer" with the client address it
# sees, "/big" with that many bytes. Every answer closes its connection.
# UDP datagrams to the same port are echoed back.
# Arguments: address, port, name, size of /big.
import http.server
import socket
import socketserver
import sys
import threading

address, port, name, big = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        if self.path == "/peer":
            body = (self.client_address[0] + "\n").encode()
        elif self.path == "/big":
            body = b"x" * big
        else:
            body = (name + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024


def echo():
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp.bind((address, port))
    while True:
        data, peer = udp.recvfrom(2048)
        udp.sendto(data, peer)


threading.Thread(target=echo, daemon=True).start()
Server((address, port), Handler).serve_forever()
