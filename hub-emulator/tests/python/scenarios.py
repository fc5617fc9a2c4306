"""Conformance scenarios: Microsoft's azure-iot-device 2.14.0 and azure-iot-hub 2.7.0
against the Tether hub emulator.

Usage: python scenarios.py <scenario>
Configuration comes from the HUB_TEST_CONFIG environment variable (JSON written by the
Rust test harness, tests/python_sdk.rs): CA path, HTTPS port, connection strings, the
control API's bearer token, ...
Prints "PASS <scenario>" and exits 0 on success; any failure raises (non-zero exit).
"""

import base64
import hashlib
import hmac
import json
import ssl
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid

from azure.iot.device import IoTHubDeviceClient, Message, MethodResponse, ProvisioningDeviceClient
from azure.iot.device.exceptions import CredentialError

CFG = json.loads(__import__("os").environ["HUB_TEST_CONFIG"])
with open(CFG["ca_path"]) as f:
    CA_PEM = f.read()
SSL_CTX = ssl.create_default_context(cafile=CFG["ca_path"])
TIMEOUT = 20


def control(method, path, body=None, headers=None):
    """Calls the emulator's control API over HTTPS, returns parsed JSON (or None)."""
    url = "https://localhost:%d%s" % (CFG["https_port"], path)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    headers = dict(headers or {}, Authorization="Bearer " + CFG["control_token"])
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, context=SSL_CTX, timeout=TIMEOUT) as resp:
        raw = resp.read()
        return json.loads(raw) if raw else None


def wait_event(device_id, kind, since=0, predicate=lambda e: True):
    """Long-polls the control API until an event of `kind` for `device_id` matches."""
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        q = urllib.parse.urlencode({"since": since, "deviceId": device_id, "type": kind, "wait": 5})
        page = control("GET", "/emulator/events?" + q)
        for e in page["events"]:
            if predicate(e):
                return e
        since = page["next"]
    raise AssertionError("no %s event for %s" % (kind, device_id))


def last_seq():
    return control("GET", "/emulator/events?since=0")["next"]


def device_client(cs, **kwargs):
    return IoTHubDeviceClient.create_from_connection_string(cs, server_verification_cert=CA_PEM, **kwargs)


def registry():
    # Imported lazily: azure-iot-hub pulls in uamqp, only the service scenarios need it.
    from azure.iot.hub import IoTHubRegistryManager

    return IoTHubRegistryManager.from_connection_string(CFG["service_cs"])


def connected(device_id):
    return control("GET", "/emulator/devices/%s/connection" % device_id)["connected"]


def wait_until(check, what):
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError("timed out waiting for " + what)


# --- scenarios ---------------------------------------------------------------------------


def scenario_connect():
    dev = CFG["device_id"]
    client = device_client(CFG["device_cs"])
    client.connect()
    assert client.connected
    wait_until(lambda: connected(dev), "device connected")
    client.disconnect()
    wait_until(lambda: not connected(dev), "device disconnected")
    client.shutdown()


def scenario_telemetry():
    dev = CFG["device_id"]
    since = last_seq()
    client = device_client(CFG["device_cs"])
    client.connect()
    msg = Message(json.dumps({"temperature": 21.5}))
    msg.message_id = str(uuid.uuid4())
    msg.correlation_id = "corr-1"
    msg.content_type = "application/json"
    msg.content_encoding = "utf-8"
    msg.custom_properties["color"] = "red"
    msg.custom_properties["with space"] = "a/b&c=d"
    client.send_message(msg)
    e = wait_event(dev, "telemetry", since)
    assert json.loads(e["body"]) == {"temperature": 21.5}, e
    props, sysprops = e["properties"], e["systemProperties"]
    assert props == {"color": "red", "with space": "a/b&c=d"}, props
    assert sysprops["messageId"] == msg.message_id, sysprops
    assert sysprops["correlationId"] == "corr-1", sysprops
    assert sysprops["contentType"] == "application/json", sysprops
    assert sysprops["contentEncoding"] == "utf-8", sysprops
    assert sysprops["iothub-connection-device-id"] == dev, sysprops
    assert json.loads(sysprops["iothub-connection-auth-method"])["type"] == "sas", sysprops
    client.shutdown()


def scenario_twin():
    from azure.iot.hub.models import Twin, TwinProperties

    dev = CFG["device_id"]
    client = device_client(CFG["device_cs"])
    received = []
    got_patch = threading.Event()

    def on_patch(patch):
        received.append(patch)
        got_patch.set()

    client.on_twin_desired_properties_patch_received = on_patch
    client.connect()
    twin = client.get_twin()
    assert "$version" in twin["desired"] and "$version" in twin["reported"], twin
    assert "$metadata" not in twin["desired"], twin

    client.patch_twin_reported_properties({"firmware": "1.2.3", "nested": {"a": 1}})
    twin2 = client.get_twin()
    assert twin2["reported"]["firmware"] == "1.2.3", twin2
    assert twin2["reported"]["$version"] > twin["reported"]["$version"], twin2
    client.patch_twin_reported_properties({"nested": None})
    twin3 = client.get_twin()
    assert "nested" not in twin3["reported"], twin3

    rm = registry()
    service_twin = rm.get_twin(dev)
    assert service_twin.properties.reported["firmware"] == "1.2.3"
    assert "$metadata" in service_twin.properties.reported
    updated = rm.update_twin(dev, Twin(properties=TwinProperties(desired={"interval": 5})), service_twin.etag)
    assert updated.properties.desired["interval"] == 5
    assert got_patch.wait(TIMEOUT), "no desired-properties notification"
    assert received[0]["interval"] == 5, received
    assert received[0]["$version"] == updated.properties.desired["$version"], received
    wait_event(dev, "twinChange", 0, lambda e: e["section"] == "desired")
    wait_event(dev, "twinChange", 0, lambda e: e["section"] == "reported" and e["patch"].get("firmware") == "1.2.3")

    # A stale etag is refused with 412.
    from msrest.exceptions import HttpOperationError

    try:
        rm.update_twin(dev, Twin(properties=TwinProperties(desired={"interval": 6})), service_twin.etag)
        raise AssertionError("stale etag accepted")
    except HttpOperationError as e:
        assert e.response.status_code == 412, e.response.status_code
    client.shutdown()


def nested(levels):
    """`levels` objects nested in each other with a leaf in the innermost: Azure's
    documented valid twin example is nested(10) under `tags`."""
    value = {"property": "value"}
    for i in reversed(range(levels)):
        value = {"l%d" % i: value}
    return value


def scenario_twin_depth():
    from azure.iot.hub.models import Twin
    from msrest.exceptions import HttpOperationError

    dev = CFG["device_id"]
    client = device_client(CFG["device_cs"])
    client.connect()
    # Device SDK, reported properties: depth 10 is stored, 11 refused (the SDK raises a
    # ClientError caused by ServiceError("twin operation returned status 400")).
    client.patch_twin_reported_properties({"deep": nested(9)})
    assert client.get_twin()["reported"]["deep"] == nested(9)
    try:
        client.patch_twin_reported_properties({"deeper": nested(10)})
        raise AssertionError("reported patch nested 11 deep accepted")
    except AssertionError:
        raise
    except Exception as e:
        assert "status 400" in str(e.__cause__), repr(e.__cause__)
    assert "deeper" not in client.get_twin()["reported"]
    client.shutdown()

    # Service SDK, tags: Azure's example (ten objects) is accepted, eleven are refused.
    rm = registry()
    updated = rm.update_twin(dev, Twin(tags=nested(10)), "*")
    assert updated.tags == nested(10), updated.tags
    try:
        rm.update_twin(dev, Twin(tags={"x": nested(10)}), "*")
        raise AssertionError("tags nested 11 deep accepted")
    except HttpOperationError as e:
        assert e.response.status_code == 400, e.response.status_code
        assert json.loads(e.response.json()["Message"])["errorCode"] == 400004


def scenario_method():
    from azure.iot.hub.models import CloudToDeviceMethod
    from msrest.exceptions import HttpOperationError

    dev = CFG["device_id"]
    rm = registry()
    # Not connected yet: 404 with IoT Hub's 404103 body.
    try:
        rm.invoke_device_method(dev, CloudToDeviceMethod(method_name="reboot", payload={}, response_timeout_in_seconds=5))
        raise AssertionError("method on offline device succeeded")
    except HttpOperationError as e:
        assert e.response.status_code == 404, e.response.status_code
        inner = json.loads(e.response.json()["Message"])
        assert inner["errorCode"] == 404103, inner
        assert e.response.headers["iothub-errorcode"] == "DeviceNotOnline"

    client = device_client(CFG["device_cs"])

    def on_method(request):
        payload = {"echo": request.payload, "name": request.name}
        client.send_method_response(MethodResponse.create_from_method_request(request, 201, payload))

    client.on_method_request_received = on_method
    client.connect()
    result = rm.invoke_device_method(dev, CloudToDeviceMethod(method_name="reboot", payload={"delay": 3}, response_timeout_in_seconds=10))
    assert result.status == 201, result.status
    assert result.payload == {"echo": {"delay": 3}, "name": "reboot"}, result.payload
    client.shutdown()


def scenario_method_payload_limit():
    from azure.iot.hub.models import CloudToDeviceMethod
    from msrest.exceptions import HttpOperationError

    dev = CFG["device_id"]
    rm = registry()
    calls = []
    client = device_client(CFG["device_cs"])

    def on_method(request):
        calls.append(request.name)
        client.send_method_response(MethodResponse.create_from_method_request(request, 200, None))

    client.on_method_request_received = on_method
    client.connect()
    # 129 KB: refused before it reaches the device.
    big = "x" * (129 * 1024)
    try:
        rm.invoke_device_method(dev, CloudToDeviceMethod(method_name="big", payload=big, response_timeout_in_seconds=5))
        raise AssertionError("129 KB method payload accepted")
    except HttpOperationError as e:
        assert e.response.status_code == 400, e.response.status_code
        assert json.loads(e.response.json()["Message"])["errorCode"] == 400004
    # Just under the limit still goes through (the JSON string adds two quotes).
    fits = "x" * (128 * 1024 - 2)
    result = rm.invoke_device_method(dev, CloudToDeviceMethod(method_name="fits", payload=fits, response_timeout_in_seconds=10))
    assert result.status == 200 and result.payload is None, result
    assert calls == ["fits"], calls
    client.shutdown()


def scenario_method_payload_shapes():
    from azure.iot.hub.models import CloudToDeviceMethod

    dev = CFG["device_id"]
    rm = registry()
    seen = []
    client = device_client(CFG["device_cs"])

    def on_method(request):
        # Echo the payload back with a non-2xx-looking but successful status.
        seen.append(request.payload)
        client.send_method_response(MethodResponse.create_from_method_request(request, 299, request.payload))

    client.on_method_request_received = on_method
    client.connect()
    # The service SDK replaces a None payload with "" before sending.
    for sent, expected in [(None, ""), ({}, {}), ("a string", "a string"), ([1, "two", None], [1, "two", None])]:
        result = rm.invoke_device_method(dev, CloudToDeviceMethod(method_name="echo", payload=sent, response_timeout_in_seconds=10))
        assert (result.status, result.payload) == (299, expected), (sent, result.status, result.payload)
        assert seen[-1] == expected, (sent, seen)
    # Without the SDK's rewriting: no payload member and an explicit null both reach the
    # device as JSON null, and its null answer comes back as null.
    for body in [{"methodName": "echo"}, {"methodName": "echo", "payload": None}]:
        answer = service_rest("POST", "/twins/%s/methods" % dev, body)
        assert answer == {"status": 299, "payload": None}, (body, answer)
        assert seen[-1] is None, seen
    client.shutdown()


def service_rest(method, path, body):
    """A raw IoT Hub service REST call with an `iothubowner` SAS, for what the service SDK
    cannot express."""
    parts = dict(p.split("=", 1) for p in CFG["service_cs"].split(";"))
    host = parts["HostName"]
    expiry = int(time.time()) + 3600
    resource = urllib.parse.quote(host, safe="")
    sig = hmac.new(base64.b64decode(parts["SharedAccessKey"]), ("%s\n%d" % (resource, expiry)).encode(), hashlib.sha256)
    token = "SharedAccessSignature sr=%s&sig=%s&se=%d&skn=%s" % (
        resource,
        urllib.parse.quote(base64.b64encode(sig.digest()).decode(), safe=""),
        expiry,
        parts["SharedAccessKeyName"],
    )
    url = "https://%s%s?api-version=2021-04-12" % (host, path)
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method=method, headers={"Authorization": token, "Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, context=SSL_CTX, timeout=TIMEOUT) as resp:
        return json.loads(resp.read())


def scenario_disabled_device():
    rm = registry()
    dev = "py-disabled-" + uuid.uuid4().hex[:8]
    pk = base64.b64encode(b"d" * 32).decode()
    sk = base64.b64encode(b"e" * 32).decode()
    created = rm.create_device_with_sas(dev, pk, sk, "disabled")
    cs = "HostName=localhost;DeviceId=%s;SharedAccessKey=%s" % (dev, pk)
    client = device_client(cs, connection_retry=False)
    try:
        client.connect()
        raise AssertionError("disabled device connected")
    except CredentialError as e:
        # CONNACK 5 (not authorized), as for every authentication failure.
        assert "not authorised" in str(e.__cause__), repr(e.__cause__)
    assert not client.connected
    assert not connected(dev)
    client.shutdown()
    # The same credentials work once the device is enabled: it was the status.
    rm.update_device_with_sas(dev, created.etag, pk, sk, "enabled")
    client = device_client(cs, connection_retry=False)
    client.connect()
    wait_until(lambda: connected(dev), "enabled device connected")
    client.shutdown()


def scenario_desired_while_offline():
    from azure.iot.hub.models import Twin, TwinProperties

    dev = CFG["device_id"]
    rm = registry()
    # Set before the device ever connects.
    rm.update_twin(dev, Twin(properties=TwinProperties(desired={"mode": "eco"})), "*")
    patches = []
    got_patch = threading.Event()

    def on_patch(patch):
        patches.append(patch)
        got_patch.set()

    client = device_client(CFG["device_cs"])
    client.connect()
    twin = client.get_twin()
    assert twin["desired"]["mode"] == "eco", twin
    # The handler is set once `$iothub/twin/res/#` is subscribed (by get_twin): set before
    # connect, the SDK sends its freshness GET before that subscription, the hub drops
    # the answer (no subscription, no response) and the SDK waits for it for good.
    client.on_twin_desired_properties_patch_received = on_patch

    # Set while the device is offline between two connections: the SDK fetches the twin
    # when it reconnects and hands the newer desired properties to the patch handler.
    client.disconnect()
    wait_until(lambda: not connected(dev), "device disconnected")
    got_patch.clear()
    updated = rm.update_twin(dev, Twin(properties=TwinProperties(desired={"mode": "turbo", "rate": 7})), "*")
    version = updated.properties.desired["$version"]
    client.connect()
    assert got_patch.wait(TIMEOUT), "desired properties set offline not delivered to the patch handler"
    last = patches[-1]
    assert (last["mode"], last["rate"], last["$version"]) == ("turbo", 7, version), patches
    twin = client.get_twin()
    assert (twin["desired"]["mode"], twin["desired"]["$version"]) == ("turbo", version), twin
    client.shutdown()


def scenario_dps_unknown_registration():
    reg_id = "py-unknown-" + uuid.uuid4().hex[:8]
    key = base64.b64encode(b"k" * 32).decode()
    client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host="localhost",
        registration_id=reg_id,
        id_scope=CFG["scope_id"],
        symmetric_key=key,
        server_verification_cert=CA_PEM,
    )
    try:
        result = client.register()
        raise AssertionError("unknown registration id registered: %s" % result)
    except CredentialError as e:
        # CONNACK 5, as for a wrong key: the hub does not tell unknown ids apart.
        assert "not authorised" in str(e.__cause__), repr(e.__cause__)
    from msrest.exceptions import HttpOperationError

    try:
        registry().get_device(reg_id)
        raise AssertionError("a device was created for an unknown registration id")
    except HttpOperationError as e:
        assert e.response.status_code == 404, e.response.status_code


def scenario_c2d():
    dev = CFG["device_id"]
    client = device_client(CFG["device_cs"])
    got = []
    done = threading.Event()

    def on_message(msg):
        got.append(msg)
        done.set()

    client.on_message_received = on_message
    client.connect()
    since = last_seq()
    sent = control(
        "POST",
        "/emulator/devices/%s/c2d" % dev,
        b"switch on",
        {
            "iothub-messageid": "msg-1",
            "iothub-correlationid": "corr-9",
            "iothub-contenttype": "text/plain",
            "iothub-app-room": "kitchen",
            "iothub-app-mode": "a b/c",
        },
    )
    assert sent["messageId"] == "msg-1", sent
    assert done.wait(TIMEOUT), "C2D message not received"
    msg = got[0]
    assert msg.data == b"switch on", msg.data
    assert msg.message_id == "msg-1", msg.message_id
    assert msg.correlation_id == "corr-9", msg.correlation_id
    assert msg.content_type == "text/plain", msg.content_type
    assert msg.custom_properties == {"room": "kitchen", "mode": "a b/c"}, msg.custom_properties
    wait_event(dev, "c2dFeedback", since, lambda e: e["messageId"] == "msg-1" and e["status"] == "Success")
    client.shutdown()


def scenario_c2d_feedback():
    from azure.iot.hub import IoTHubHttpRuntimeManager
    from msrest.exceptions import HttpOperationError

    dev = CFG["device_id"]
    runtime = IoTHubHttpRuntimeManager.from_connection_string(CFG["service_cs"])
    feedback = runtime.protocol.cloud_to_device_messages

    def receive():
        # The manager's receive_feedback_notification() returns None: the batch and its
        # lock token are only on the raw response.
        return feedback.receive_feedback_notification(raw=True).response

    assert receive().status_code == 204, "feedback before any C2D message"
    client = device_client(CFG["device_cs"])
    client.connect()
    client.on_message_received = lambda msg: None
    since = last_seq()
    for ack in ["full", "positive", "negative", "none"]:
        control("POST", "/emulator/devices/%s/c2d" % dev, b"x", {"iothub-messageid": "fb-" + ack, "iothub-ack": ack})
    for ack in ["full", "positive", "negative", "none"]:
        wait_event(dev, "c2dFeedback", since, lambda e, ack=ack: e["messageId"] == "fb-" + ack)
    client.shutdown()
    # A negative outcome: purged while the device is offline.
    control("POST", "/emulator/devices/%s/c2d" % dev, b"y", {"iothub-messageid": "fb-purged", "iothub-ack": "negative"})
    registry().protocol.cloud_to_device_messages.purge_cloud_to_device_message_queue(dev)

    resp = receive()
    assert resp.status_code == 200, resp.status_code
    assert resp.headers["Content-Type"] == "application/vnd.microsoft.iothub.feedback.json"
    records = resp.json()
    outcomes = sorted((r["originalMessageId"], r["statusCode"]) for r in records)
    assert outcomes == [("fb-full", "Success"), ("fb-positive", "Success"), ("fb-purged", "Purged")], outcomes
    assert all(r["deviceId"] == dev for r in records), records
    token = resp.headers["ETag"].strip('"')

    runtime.abandon_feedback_notification(token)
    again = receive()
    assert again.status_code == 200 and again.json() == records, again.status_code
    assert again.headers["iothub-deliverycount"] == "2", again.headers
    new_token = again.headers["ETag"].strip('"')
    runtime.complete_feedback_notification(new_token)
    assert receive().status_code == 204, "completed feedback received again"
    try:
        runtime.complete_feedback_notification(new_token)
        raise AssertionError("a used lock token completed again")
    except HttpOperationError as e:
        assert e.response.status_code == 412, e.response.status_code


def scenario_sas_renewal():
    dev = CFG["device_id"]
    since = last_seq()
    # The SDK renews 120 s before expiry, so a 125 s token is renewed after ~5 s: it
    # disconnects and reconnects with a fresh token.
    client = device_client(CFG["device_cs"], sastoken_ttl=125)
    client.connect()
    first = wait_event(dev, "connected", since)
    wait_event(dev, "disconnected", first["seq"])
    again = wait_event(dev, "connected", first["seq"])
    wait_until(lambda: client.connected, "client reconnected")
    client.send_message(Message("after renewal"))
    wait_event(dev, "telemetry", again["seq"], lambda e: e["body"] == "after renewal")
    client.shutdown()


def scenario_websocket():
    import paho.mqtt.client as paho

    # azure-iot-device hard-codes port 443 for WebSockets; redirect paho to the emulator's
    # HTTPS port (the SDK calls connect(host=, port=, keepalive=) with keywords).
    original = paho.Client.connect

    def connect(self, *args, **kwargs):
        kwargs["port"] = CFG["https_port"]
        return original(self, *args, **kwargs)

    paho.Client.connect = connect
    dev = CFG["device_id"]
    since = last_seq()
    client = device_client(CFG["device_cs"], websockets=True)
    client.connect()
    wait_until(lambda: connected(dev), "device connected over WebSocket")
    client.send_message(Message("over websocket"))
    wait_event(dev, "telemetry", since, lambda e: e["body"] == "over websocket")
    twin = client.get_twin()
    assert twin["reported"]["$version"] >= 1, twin
    client.disconnect()
    wait_until(lambda: not connected(dev), "device disconnected")
    client.shutdown()


def provision(registration_id, key):
    client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host="localhost",
        registration_id=registration_id,
        id_scope=CFG["scope_id"],
        symmetric_key=key,
        server_verification_cert=CA_PEM,
    )
    client.provisioning_payload = {"model": "tether"}
    result = client.register()
    assert result.status == "assigned", result
    state = result.registration_state
    assert state.assigned_hub == "localhost", state.assigned_hub
    return state


def connect_provisioned(state, key):
    client = IoTHubDeviceClient.create_from_symmetric_key(
        symmetric_key=key, hostname=state.assigned_hub, device_id=state.device_id, server_verification_cert=CA_PEM
    )
    client.connect()
    client.send_message(Message("provisioned"))
    wait_event(state.device_id, "telemetry", 0, lambda e: e["body"] == "provisioned")
    client.shutdown()


def scenario_dps_individual():
    state = provision(CFG["registration_id"], CFG["enrollment_key"])
    assert state.device_id == CFG["expected_device_id"], state.device_id
    connect_provisioned(state, CFG["enrollment_key"])
    device = registry().get_device(state.device_id)
    assert device.authentication.type == "sas", device.authentication.type
    assert device.authentication.symmetric_key.primary_key == CFG["enrollment_key"]


def scenario_dps_group():
    reg_id = CFG["registration_id"]
    group_key = base64.b64decode(CFG["group_key"])
    key = base64.b64encode(hmac.new(group_key, reg_id.encode(), hashlib.sha256).digest()).decode()
    state = provision(reg_id, key)
    assert state.device_id == reg_id, state.device_id
    connect_provisioned(state, key)
    device = registry().get_device(reg_id)
    assert device.authentication.type == "sas"
    # A key derived for another registration id is refused.
    wrong = base64.b64encode(hmac.new(group_key, b"someone-else", hashlib.sha256).digest()).decode()
    try:
        provision(reg_id, wrong)
        raise AssertionError("registration with a wrong derived key succeeded")
    except AssertionError:
        raise
    except Exception:
        pass


def scenario_registry():
    from msrest.exceptions import HttpOperationError

    rm = registry()
    dev = "py-registry-" + uuid.uuid4().hex[:8]
    pk = base64.b64encode(b"p" * 32).decode()
    sk = base64.b64encode(b"s" * 32).decode()
    created = rm.create_device_with_sas(dev, pk, sk, "enabled")
    assert created.device_id == dev and created.etag, created
    assert created.authentication.symmetric_key.primary_key == pk

    def status_of(call):
        try:
            call()
        except HttpOperationError as e:
            return e.response.status_code, e.response.headers.get("iothub-errorcode"), json.loads(e.response.json()["Message"])
        raise AssertionError("call succeeded")

    status, code, body = status_of(lambda: rm.create_device_with_sas(dev, pk, sk, "enabled"))
    assert (status, code, body["errorCode"]) == (409, "DeviceAlreadyExists", 409001), (status, code, body)

    got = rm.get_device(dev)
    assert got.etag == created.etag and got.status == "enabled"
    updated = rm.update_device_with_sas(dev, got.etag, pk, sk, "disabled")
    assert updated.status == "disabled" and updated.etag != got.etag, updated
    status, code, body = status_of(lambda: rm.update_device_with_sas(dev, got.etag, pk, sk, "enabled"))
    assert (status, code, body["errorCode"]) == (412, "PreconditionFailed", 412001), (status, code, body)

    ids = [d.device_id for d in rm.get_devices()]
    assert dev in ids, ids
    stats = rm.get_device_registry_statistics()
    assert stats.total_device_count >= 1 and stats.disabled_device_count >= 1, stats

    rm.delete_device(dev)
    status, code, body = status_of(lambda: rm.get_device(dev))
    assert (status, code, body["errorCode"]) == (404, "DeviceNotFound", 404001), (status, code, body)
    status, code, _ = status_of(lambda: rm.delete_device(dev))
    assert (status, code) == (404, "DeviceNotFound"), (status, code)


def scenario_registry_x509():
    from msrest.exceptions import HttpOperationError

    rm = registry()
    sha1, sha256 = "AB" * 20, "cd" * 32
    dev = rm.create_device_with_x509("py-x509-self", sha1, sha256, "enabled")
    auth = dev.authentication
    assert auth.type == "selfSigned", auth
    assert (auth.x509_thumbprint.primary_thumbprint, auth.x509_thumbprint.secondary_thumbprint) == (sha1, sha256)
    assert auth.symmetric_key is None or auth.symmetric_key.primary_key is None, auth.symmetric_key
    got = rm.get_device("py-x509-self").authentication
    assert got.type == "selfSigned" and got.x509_thumbprint.secondary_thumbprint == sha256, got

    ca = rm.create_device_with_certificate_authority("py-x509-ca", "enabled")
    assert ca.authentication.type == "certificateAuthority", ca.authentication
    got = rm.get_device("py-x509-ca").authentication
    assert got.type == "certificateAuthority" and got.x509_thumbprint.primary_thumbprint is None, got

    try:
        rm.create_device_with_x509("py-x509-bad", "not-a-thumbprint", sha256, "enabled")
        raise AssertionError("bad thumbprint accepted")
    except HttpOperationError as e:
        body = json.loads(e.response.json()["Message"])
        assert e.response.status_code == 400 and body["errorCode"] == 400004, (e.response.status_code, body)


def scenario_x509_self_signed():
    from azure.iot.device import X509

    rm = registry()
    dev = "py-x509-dev"
    rm.create_device_with_x509(dev, CFG["thumbprint"], None, "enabled")

    def client_for(cert, key):
        return IoTHubDeviceClient.create_from_x509_certificate(
            x509=X509(cert, key), hostname="localhost", device_id=dev,
            server_verification_cert=CA_PEM, connection_retry=False,
        )

    since = last_seq()
    client = client_for(CFG["cert_file"], CFG["key_file"])
    client.connect()
    client.send_message(Message("from x509"))
    e = wait_event(dev, "telemetry", since)
    assert e["body"] == "from x509", e
    method = json.loads(e["systemProperties"]["iothub-connection-auth-method"])
    assert method["type"] == "x509Certificate", method
    client.shutdown()

    client = client_for(CFG["wrong_cert_file"], CFG["wrong_key_file"])
    try:
        client.connect()
        raise AssertionError("device connected with a certificate not registered")
    except CredentialError as e:
        assert "not authorised" in str(e.__cause__), repr(e.__cause__)
    assert not client.connected
    client.shutdown()


def scenario_x509_ca():
    from azure.iot.device import X509

    rm = registry()
    dev = CFG["device_id"]
    rm.create_device_with_certificate_authority(dev, "enabled")
    with open(CFG["ca_cert_file"]) as f:
        registered = control("POST", "/emulator/cas", {"certificate": f.read()})
    assert len(registered["thumbprint"]) == 64, registered

    since = last_seq()
    client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(CFG["cert_file"], CFG["key_file"]), hostname="localhost", device_id=dev,
        server_verification_cert=CA_PEM, connection_retry=False,
    )
    client.connect()
    client.send_message(Message("from a CA-signed device"))
    e = wait_event(dev, "telemetry", since)
    assert e["body"] == "from a CA-signed device", e
    client.shutdown()


def scenario_query():
    from azure.iot.hub.models import QuerySpecification, Twin
    from msrest.exceptions import HttpOperationError

    rm = registry()
    sites = {"q-a": "north", "q-b": "south", "q-c": "north", "q-d": "north"}
    temps = {"q-a": 20, "q-b": 25, "q-c": 30, "q-d": 21.5}
    for dev, site in sites.items():
        pk = base64.b64encode(dev.encode() * 8).decode()
        rm.create_device_with_sas(dev, pk, pk, "enabled")
        rm.update_twin(dev, Twin(tags={"site": site}), "*")
        # Reported properties come from the device, as on Azure.
        client = device_client("HostName=localhost;DeviceId=%s;SharedAccessKey=%s" % (dev, pk))
        client.connect()
        client.patch_twin_reported_properties({"temp": temps[dev], "fw": "1.%d" % len(dev)})
        client.shutdown()

    def ids(text, **kwargs):
        result = rm.query_iot_hub(QuerySpecification(query=text), **kwargs)
        assert result.type == "twin", result.type
        return [t.device_id for t in result.items], result.continuation_token

    assert ids("SELECT * FROM devices WHERE tags.site = 'north'") == (["q-a", "q-c", "q-d"], None)
    assert ids("SELECT * FROM devices WHERE properties.reported.temp > 21") == (["q-b", "q-c", "q-d"], None)
    assert ids("SELECT * FROM devices WHERE tags.site = 'north' AND NOT properties.reported.temp >= 30") == (
        ["q-a", "q-d"],
        None,
    )
    # Azure's documented spellings: IN/NIN with arrays, double-quoted strings, names in any case.
    assert ids("SELECT * FROM devices WHERE deviceId IN ['q-b', 'q-d']") == (["q-b", "q-d"], None)
    assert ids('SELECT * FROM devices WHERE Tags.Site = "north" AND deviceId NIN [\'q-a\']') == (["q-c", "q-d"], None)
    # The twins carry what the device reported.
    twin = rm.query_iot_hub(QuerySpecification(query="SELECT * FROM devices WHERE deviceId = 'q-d'")).items[0]
    assert twin.tags == {"site": "north"} and twin.properties.reported["temp"] == 21.5, twin

    # Paging: two at a time, following the continuation token.
    pages, token = [], None
    while True:
        page, token = ids("SELECT * FROM devices", continuation_token=token, max_item_count=2)
        pages.append(page)
        if token is None:
            break
    assert pages == [["q-a", "q-b"], ["q-c", "q-d"]], pages

    # Projections are `json` items, which the SDK would read as twins: read them raw.
    text = "SELECT deviceId, tags.site, properties.reported.temp FROM devices WHERE tags.site != 'north'"
    raw = rm.protocol.query.get_twins(QuerySpecification(query=text), raw=True)
    assert raw.response.headers["x-ms-item-type"] == "json"
    assert raw.response.json() == [{"deviceId": "q-b", "site": "south", "temp": 25}], raw.response.json()
    text = "SELECT tags.site, COUNT() AS numberOfDevices FROM devices GROUP BY tags.site"
    counts = rm.protocol.query.get_twins(QuerySpecification(query=text), raw=True).response.json()
    assert counts == [{"site": "north", "numberOfDevices": 3}, {"site": "south", "numberOfDevices": 1}], counts

    # Outside the subset: refused, never answered differently.
    try:
        rm.query_iot_hub(QuerySpecification(query="SELECT * FROM devices.modules WHERE moduleId = 'm'"))
        raise AssertionError("module query accepted")
    except HttpOperationError as e:
        body = json.loads(e.response.json()["Message"])
        assert e.response.status_code == 400 and e.response.headers["iothub-errorcode"] == "BadRequest", e.response
        assert body["errorCode"] == 400000, body


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}

if __name__ == "__main__":
    name = sys.argv[1]
    SCENARIOS[name]()
    print("PASS", name, flush=True)
