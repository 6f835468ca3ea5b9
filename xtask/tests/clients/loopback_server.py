# Answers every GET with "node-loopback" on 127.0.0.1:8080 only.
import http.server


class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"node-loopback\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", 8080), Answer).serve_forever()
