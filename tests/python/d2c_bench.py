"""D2C telemetry sender for `cargo bench -p tether-tests --bench d2c`, using Microsoft's
azure-iot-device (asyncio client) against the hub emulator.

Configuration: JSON in the D2C_BENCH_CONFIG environment variable, written by
tests/benches/d2c.rs:
  mode      "run" or "mem"
  ca_path   the emulator's CA certificate (PEM)
  cs        device connection strings (run: the first; mem: all of them)
  n         messages to send (run), or per client (mem)
  window    sends awaited concurrently (run)

Protocol on stdout, lines starting with "BENCH ":
  run: "BENCH ready" once connected; waits for a line on stdin; sends; then
       "BENCH {json}" with n, errors, elapsed_us, p50_us, p99_us; waits for a line
       on stdin again (the bench reads our CPU time meanwhile), then exits.
  mem: connects the clients one by one (each sends n messages), then
       "BENCH {json}" with rss_start_kib (interpreter only), rss_one_kib (SDK imported,
       one client connected) and rss_all_kib (every client connected).

azure-iot-device always publishes telemetry at MQTT QoS 1 and completes send_message on
PUBACK, so latency here is send_message → PUBACK.
"""

import asyncio
import json
import os
import sys
import time


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


RSS_START = rss_kib()

from azure.iot.device import Message  # noqa: E402
from azure.iot.device.aio import IoTHubDeviceClient  # noqa: E402

CFG = json.loads(os.environ["D2C_BENCH_CONFIG"])
with open(CFG["ca_path"]) as f:
    CA_PEM = f.read()


def body(i):
    """The benchmark's 100-byte body, as in the Rust senders."""
    s = '{"seq":%08d,"temperature":21.5,"pad":"' % i
    return s + "x" * (98 - len(s)) + '"}'


def message(i):
    m = Message(body(i))
    m.custom_properties["bench"] = "d2c"
    return m


def say(text):
    sys.stdout.write("BENCH " + text + "\n")
    sys.stdout.flush()


async def connect(cs):
    client = IoTHubDeviceClient.create_from_connection_string(cs, server_verification_cert=CA_PEM)
    await client.connect()
    return client


async def send_all(client, n, window):
    """Sends n messages with up to `window` awaited at once; returns latencies and errors."""
    latencies, errors = [], [0]
    queue = iter(range(n))

    async def worker():
        for i in queue:
            t = time.perf_counter()
            try:
                await client.send_message(message(i))
            except Exception:  # noqa: BLE001 - counted, reported by the caller
                errors[0] += 1
            latencies.append(time.perf_counter() - t)

    await asyncio.gather(*(worker() for _ in range(max(1, min(window, n)))))
    return latencies, errors[0]


async def run():
    client = await connect(CFG["cs"][0])
    say("ready")
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    start = time.perf_counter()
    latencies, errors = await send_all(client, CFG["n"], CFG["window"])
    elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(p):
        return int(latencies[round((len(latencies) - 1) * p)] * 1e6) if latencies else 0

    say(json.dumps({"n": CFG["n"], "errors": errors, "elapsed_us": int(elapsed * 1e6), "p50_us": pct(0.5), "p99_us": pct(0.99)}))
    # The bench reads this process's CPU time now, then says bye.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await client.shutdown()


async def mem():
    clients = []
    rss_one = 0
    for cs in CFG["cs"]:
        client = await connect(cs)
        await send_all(client, CFG["n"], 1)
        clients.append(client)
        if not rss_one:
            await asyncio.sleep(0.5)
            rss_one = rss_kib()
    await asyncio.sleep(0.5)
    say(json.dumps({"rss_start_kib": RSS_START, "rss_one_kib": rss_one, "rss_all_kib": rss_kib(), "clients": len(clients)}))
    for client in clients:
        await client.shutdown()


asyncio.run(run() if CFG["mode"] == "run" else mem())
