#!/usr/bin/env python3
"""An ADS (state-of-the-world) management server for l4lb's xDS tests (issue 36).

Written on grpcio and the `xds-protos` package: the generated Envoy API every Python control
plane uses, so what l4lb decodes here is what a real control plane sends. It serves CDS and
EDS on one aggregated stream, like go-control-plane's SotW server:

- a request whose nonce is not the last one sent for its type is stale and ignored;
- a request with the last nonce is an ACK (same version as sent) or a NACK (error_detail);
- a new stream or a changed EDS subscription gets the current resources at once;
- a state change (POST /state) is pushed to every stream, once; with one response in
  flight per type (a change while one is unanswered goes out with the answer).

Controlled over HTTP on --control-port (loopback):
  POST /state   {"version": "v2", "clusters": [<Cluster, proto3 JSON>],
                 "assignments": [<ClusterLoadAssignment, proto3 JSON>]}
  GET  /log     every request received, in order, and every response sent
  POST /churn   {"rate": 10, "seconds": 60}: new EDS weights `rate` times a second
  GET  /ready   200 once serving
"""

import argparse
import json
import queue
import random
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from google.protobuf import any_pb2, json_format

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.version = "0"
        self.clusters = []  # [Cluster]
        self.assignments = {}  # name -> ClusterLoadAssignment
        self.streams = []  # [queue.Queue]
        self.log = []  # dicts, requests and responses in order
        self.nonce = 0

    def next_nonce(self):
        with self.lock:
            self.nonce += 1
            return str(self.nonce)

    def record(self, entry):
        with self.lock:
            entry["at"] = time.time()
            self.log.append(entry)

    def set(self, body):
        clusters = [json_format.ParseDict(c, cluster_pb2.Cluster()) for c in body.get("clusters", [])]
        assignments = {}
        for a in body.get("assignments", []):
            cla = json_format.ParseDict(a, endpoint_pb2.ClusterLoadAssignment())
            assignments[cla.cluster_name] = cla
        with self.lock:
            self.version = str(body.get("version") or self.version + "+")
            if "clusters" in body:
                self.clusters = clusters
            if "assignments" in body:
                self.assignments = assignments
            streams = list(self.streams)
        for q in streams:
            q.put(("push", None))

    def snapshot(self, type_url, names):
        with self.lock:
            if type_url == CDS:
                resources = list(self.clusters)
            else:
                resources = [self.assignments[n] for n in names if n in self.assignments]
            return self.version, resources


STATE = State()


class ADS(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def StreamAggregatedResources(self, request_iterator, context):
        events = queue.Queue()
        with STATE.lock:
            STATE.streams.append(events)
        peer = context.peer()

        def read():
            try:
                for request in request_iterator:
                    events.put(("request", request))
            except Exception:
                pass
            events.put(("end", None))

        threading.Thread(target=read, daemon=True).start()
        sent_nonce = {}  # type -> last nonce sent
        sent_version = {}  # type -> version last sent
        subscribed = {}  # type -> resource names (EDS) or [] (CDS wildcard)
        # One response in flight per type, as go-control-plane: a change while l4lb has not
        # answered the last one is sent when it does (the newest state then).
        awaiting = set()
        pending = set()
        built = {}  # (type, resource ids) -> (resources, DiscoveryResponse): this stream's bodies
        try:
            while context.is_active():
                try:
                    kind, request = events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if kind == "end":
                    return
                if kind == "push":
                    for type_url in list(subscribed):
                        if type_url in awaiting:
                            pending.add(type_url)
                        else:
                            awaiting.add(type_url)
                            yield self.respond(type_url, subscribed[type_url], sent_nonce, sent_version, peer, built)
                    continue
                type_url = request.type_url
                STATE.record({
                    "kind": "request", "peer": peer, "type_url": type_url,
                    "version_info": request.version_info, "response_nonce": request.response_nonce,
                    "resource_names": list(request.resource_names),
                    "node_id": request.node.id, "node_cluster": request.node.cluster,
                    "user_agent_name": request.node.user_agent_name,
                    "error_detail": request.error_detail.message if request.HasField("error_detail") else None,
                    "error_code": request.error_detail.code if request.HasField("error_detail") else None,
                })
                if request.response_nonce and request.response_nonce != sent_nonce.get(type_url):
                    continue  # stale: a response has been sent since
                awaiting.discard(type_url)
                names = list(request.resource_names)
                changed = subscribed.get(type_url) != names
                subscribed[type_url] = names
                version, _ = STATE.snapshot(type_url, names)
                if not request.response_nonce or changed or version != sent_version.get(type_url) or type_url in pending:
                    pending.discard(type_url)
                    if request.HasField("error_detail") and not changed and version == sent_version.get(type_url):
                        continue  # a NACK of the current version: wait for a new one
                    awaiting.add(type_url)
                    yield self.respond(type_url, names, sent_nonce, sent_version, peer, built)
        finally:
            with STATE.lock:
                if events in STATE.streams:
                    STATE.streams.remove(events)

    def respond(self, type_url, names, sent_nonce, sent_version, peer, built):
        version, resources = STATE.snapshot(type_url, names)
        # The same resources (the churn's prebuilt variants) make the same response body: built
        # once per stream, only the version and nonce set per send, so the server's own CPU
        # (it shares the machine with what bench/xds_scale.py measures) stays small.
        key = (type_url, tuple(id(r) for r in resources))
        response = built.get(key)
        if response is None or any(a is not b for a, b in zip(response[0], resources)):
            message = discovery_pb2.DiscoveryResponse(type_url=type_url)
            for resource in resources:
                message.resources.append(pack(resource))
            built[key] = response = (list(resources), message)
            if len(built) > 64:
                built.pop(next(iter(built)))
        response = response[1]
        response.version_info = version
        response.nonce = STATE.next_nonce()
        sent_nonce[type_url] = response.nonce
        sent_version[type_url] = version
        STATE.record({"kind": "response", "peer": peer, "type_url": type_url, "version_info": version,
                      "nonce": response.nonce, "resources": len(resources)})
        return response


PACKED = {}  # id(resource) -> (resource, Any): the churn's variants are packed once


def pack(resource):
    cached = PACKED.get(id(resource))
    if cached is not None and cached[0] is resource:
        return cached[1]
    packed = any_pb2.Any()
    packed.Pack(resource)
    return packed


def churn(rate, seconds):
    """New endpoint weights `rate` times a second for `seconds`: every update is a new version
    and changes every endpoint's weight. The variants are made and packed before the clock
    starts, so the server's own CPU (it shares the machine) stays out of what is measured."""
    variants = []
    with STATE.lock:
        current = dict(STATE.assignments)
    for _ in range(16):
        assignments = {}
        for name, cla in current.items():
            copy = endpoint_pb2.ClusterLoadAssignment()
            copy.CopyFrom(cla)
            for locality in copy.endpoints:
                for lb in locality.lb_endpoints:
                    lb.load_balancing_weight.value = random.randint(1, 100)
            assignments[name] = copy
            packed = any_pb2.Any()
            packed.Pack(copy)
            PACKED[id(copy)] = (copy, packed)
        variants.append(assignments)
    deadline = time.time() + seconds
    tick = 1.0 / rate
    n = 0
    while time.time() < deadline:
        started = time.time()
        with STATE.lock:
            STATE.assignments = variants[n % len(variants)]
            n += 1
            STATE.version = "churn-%d" % n
            streams = list(STATE.streams)
        for q in streams:
            q.put(("push", None))
        time.sleep(max(0.0, tick - (time.time() - started)))


class Control(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/ready":
            return self.reply(200, {"ok": True})
        if self.path == "/log":
            with STATE.lock:
                return self.reply(200, list(STATE.log))
        self.reply(404, {"error": "no such path"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        try:
            if self.path == "/state":
                STATE.set(body)
                return self.reply(200, {"version": STATE.version})
            if self.path == "/churn":
                threading.Thread(target=churn, args=(float(body.get("rate", 10)), float(body.get("seconds", 60))), daemon=True).start()
                return self.reply(200, {"ok": True})
        except Exception as error:  # a bad test body: say so
            return self.reply(400, {"error": str(error)})
        self.reply(404, {"error": "no such path"})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--state", help="a JSON file with the initial state (as POST /state)")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--client-ca", help="require client certificates signed by this CA (mTLS)")
    args = parser.parse_args()
    if args.state:
        with open(args.state) as f:
            STATE.set(json.load(f))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ADS(), server)
    address = "127.0.0.1:%d" % args.port
    if args.cert:
        with open(args.cert, "rb") as f:
            cert = f.read()
        with open(args.key, "rb") as f:
            key = f.read()
        ca = None
        if args.client_ca:
            with open(args.client_ca, "rb") as f:
                ca = f.read()
        credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
        server.add_secure_port(address, credentials)
    else:
        server.add_insecure_port(address)
    server.start()
    control = ThreadingHTTPServer(("127.0.0.1", args.control_port), Control)
    threading.Thread(target=control.serve_forever, daemon=True).start()
    print("xds server on %s, control on %d" % (address, args.control_port), flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
