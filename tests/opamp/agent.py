"""An OpAMP agent built on the official OpenTelemetry Python OpAMP client
(`opentelemetry-opamp-client`), for SecuMon's OpAMP tests.

Usage: agent.py <endpoint> <token> <host.name>

Connects with a full state report, reports its health, then polls every second. Prints one JSON line per event on
stdout: {"event": "uid", "instance_uid": "<uuid>"} first, then {"event": "config", ...} for each
remote configuration received (which it applies, reporting APPLIED and the new effective
configuration), and {"event": "error", ...} for an error answer. Stops (sending AgentDisconnect)
when stdin closes.
"""

import json
import sys
import time
import uuid

from opentelemetry._opamp.agent import OpAMPAgent
from opentelemetry._opamp.callbacks import OpAMPCallbacks
from opentelemetry._opamp.client import OpAMPClient
from opentelemetry._opamp.proto import opamp_pb2


def emit(**event):
    print(json.dumps(event), flush=True)


class Callbacks(OpAMPCallbacks):
    def on_message(self, agent, client, message):
        remote = message.remote_config
        if remote is None:
            return
        files = dict(client.decode_remote_config(remote))
        emit(event="config", files=files, config_hash=remote.config_hash.hex())
        client.update_effective_config(files, "application/json")
        status = client.update_remote_config_status(
            remote_config_hash=remote.config_hash,
            status=opamp_pb2.RemoteConfigStatuses_APPLIED,
        )
        if status is not None:
            agent.send(client.build_remote_config_status_response_message(status))
            agent.send(client.build_full_state_message())

    def on_error(self, agent, client, error_response):
        emit(event="error", type=error_response.type, message=error_response.error_message)


def main():
    endpoint, token, host = sys.argv[1:4]
    client = OpAMPClient(
        endpoint=endpoint,
        headers={"Authorization": f"Bearer {token}"},
        timeout_millis=5000,
        agent_identifying_attributes={
            "service.name": "python-opamp-test",
            "service.version": "1.2.3",
        },
        agent_non_identifying_attributes={
            "host.name": host,
            "os.type": "linux",
            "os.description": "Debian GNU/Linux 12",
        },
    )
    emit(event="uid", instance_uid=str(uuid.UUID(bytes=client._instance_uid)))
    agent = OpAMPAgent(interval=1, callbacks=Callbacks(), client=client, initial_backoff=0.2)
    agent.start()
    # The client has no health API yet: report health with its own protobuf types, sent through
    # its own transport and sequence.
    health = opamp_pb2.AgentToServer(
        instance_uid=client._instance_uid,
        sequence_num=client._sequence_num,
        capabilities=client._capabilities | opamp_pb2.AgentCapabilities_ReportsHealth,
        health=opamp_pb2.ComponentHealth(
            healthy=True,
            status="running",
            start_time_unix_nano=time.time_ns(),
            component_health_map={"exporter": opamp_pb2.ComponentHealth(healthy=False, last_error="queue full")},
        ),
    )
    agent.send(health.SerializeToString())
    sys.stdin.read()
    agent.stop(timeout=5)


if __name__ == "__main__":
    main()
