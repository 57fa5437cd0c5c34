#!/usr/bin/env python3
"""A Sparkplug B edge node for the agent's end-to-end tests, built on pysparkplug (an
independent implementation of the specification), driven line by line on stdin.

Commands (one per line):
  birth                     NBIRTH (seq 0) and a DBIRTH for every device
  data DEVICE NAME=VALUE..  DDATA with aliases only (no names, no datatypes), next seq
  skip N                    burns N sequence numbers: the host sees a gap
  ddeath DEVICE             DDEATH
  die                       drops the socket: the broker publishes the NDEATH will
Events printed (one per line, flushed):
  connected | done CMD | ncmd NAME=VALUE | dcmd DEVICE NAME=VALUE | reborn

The node answers a "Node Control/Rebirth" NCMD as the specification requires: births again,
seq 0, same bdSeq.
"""
import argparse
import socket
import sys
import threading

from pysparkplug import (
    Client,
    ClientOptions,
    DataType,
    DBirth,
    DData,
    DDeath,
    Message,
    MessageType,
    Metric,
    NBirth,
    NDeath,
    QoS,
    Topic,
    get_current_timestamp,
)

# Per device: metric name -> (alias, datatype, value). Aliases are unique across the node.
DEVICES = {
    "Press_1": {
        "temperature": (10, DataType.DOUBLE, 20.5),
        "count": (11, DataType.INT64, 0),
        "running": (12, DataType.BOOLEAN, True),
        "name": (13, DataType.STRING, "press one"),
        "Config/setpoint": (14, DataType.FLOAT, 1.5),
    },
    "Press_2": {
        "temperature": (20, DataType.DOUBLE, 19.5),
    },
}
NODE_METRICS = {"Properties/Firmware": (1, DataType.STRING, "1.2.3")}
BD_SEQ = 0


def say(line):
    print(line, flush=True)


class EdgeNode:
    def __init__(self, args):
        self.args = args
        self.seq = 0
        self.lock = threading.RLock()
        self.client = Client(
            client_id=f"{args.group}-{args.node}",
            client_options=ClientOptions(reconnect_on_failure=False),
        )
        # paho 1.x lets an exception in a callback end its network thread silently.
        self.client._client.suppress_exceptions = True

    def topic(self, kind, device=None):
        return Topic(message_type=kind, group_id=self.args.group, edge_node_id=self.args.node, device_id=device)

    def publish(self, kind, payload, device=None):
        self.client.publish(Message(topic=self.topic(kind, device), payload=payload, qos=QoS.AT_MOST_ONCE, retain=False))

    def next_seq(self):
        s = self.seq
        self.seq = (self.seq + 1) % 256
        return s

    def births(self):
        with self.lock:
            self.seq = 0
            ts = get_current_timestamp()
            metrics = [
                Metric(timestamp=ts, name="bdSeq", datatype=DataType.INT64, value=BD_SEQ),
                Metric(timestamp=ts, name="Node Control/Rebirth", datatype=DataType.BOOLEAN, value=False),
            ] + [Metric(timestamp=ts, name=n, alias=a, datatype=t, value=v) for n, (a, t, v) in NODE_METRICS.items()]
            self.publish(MessageType.NBIRTH, NBirth(timestamp=ts, seq=self.next_seq(), metrics=tuple(metrics)))
            for device, metrics in DEVICES.items():
                ms = tuple(Metric(timestamp=ts, name=n, alias=a, datatype=t, value=v) for n, (a, t, v) in metrics.items())
                self.publish(MessageType.DBIRTH, DBirth(timestamp=ts, seq=self.next_seq(), metrics=ms), device)

    def data(self, device, assignments):
        with self.lock:
            ts = get_current_timestamp()
            ms = []
            for a in assignments:
                name, text = a.split("=", 1)
                alias, datatype, old = DEVICES[device][name]
                value = type(old)(text) if not isinstance(old, bool) else text == "true"
                DEVICES[device][name] = (alias, datatype, value)
                ms.append(Metric(timestamp=ts, name=None, alias=alias, datatype=datatype, value=value))
            self.publish(MessageType.DDATA, DData(timestamp=ts, seq=self.next_seq(), metrics=tuple(ms)), device)

    def on_command(self, _client, message):
        device = message.topic.device_id
        for m in message.payload.metrics:
            if device is None:
                say(f"ncmd {m.name}={m.value}")
                if m.name == "Node Control/Rebirth" and m.value is True:
                    self.births()
                    say("reborn")
            else:
                say(f"dcmd {device} {m.name}={m.value}")

    def run(self):
        will = Message(
            topic=self.topic(MessageType.NDEATH),
            payload=NDeath(
                timestamp=get_current_timestamp(),
                bd_seq_metric=Metric(timestamp=get_current_timestamp(), name="bdSeq", datatype=DataType.INT64, value=BD_SEQ),
            ),
            qos=QoS.AT_LEAST_ONCE,
            retain=False,
        )
        self.client.set_will(will)
        subscribed = threading.Event()

        def on_connect(client):
            client.subscribe(self.topic(MessageType.NCMD), QoS.AT_LEAST_ONCE, self.on_command)
            client.subscribe(
                Topic(message_type=MessageType.DCMD, group_id=self.args.group, edge_node_id=self.args.node, device_id="+"),
                QoS.AT_LEAST_ONCE,
                self.on_command,
            )
            subscribed.set()

        self.client.connect(self.args.host, port=self.args.port, keepalive=5, blocking=False, callback=on_connect)
        if not subscribed.wait(20):
            say("error: no CONNACK from the broker within 20 s")
            return 1
        say("connected")
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            cmd = words[0]
            if cmd == "birth":
                self.births()
            elif cmd == "data":
                self.data(words[1], words[2:])
            elif cmd == "skip":
                with self.lock:
                    self.seq = (self.seq + int(words[1])) % 256
            elif cmd == "ddeath":
                with self.lock:
                    self.publish(MessageType.DDEATH, DDeath(timestamp=get_current_timestamp(), seq=self.next_seq()), words[1])
            elif cmd == "die":
                paho = self.client._client
                paho.loop_stop()
                sock = paho.socket()
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
                say("done die")
                return 0
            else:
                say(f"error: unknown command {cmd}")
                continue
            say(f"done {cmd}")
        return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--group", default="Plant1")
    p.add_argument("--node", default="GW1")
    sys.exit(EdgeNode(p.parse_args()).run())


if __name__ == "__main__":
    main()
