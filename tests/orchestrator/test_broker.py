from __future__ import annotations

import asyncio

import pytest

from deepfleet.errors import DeviceError
from deepfleet.orchestrator.broker import DeviceBroker

FLEET = [{"name": "e1", "device_class": "edison"}, {"name": "e2", "device_class": "edison"},
         {"name": "p1", "device_class": "pi"}]


def test_leases_are_exclusive_and_first_come_first_served() -> None:
    async def scenario() -> list[str]:
        b = DeviceBroker(FLEET)
        first = await b.acquire("edison", "t0")
        second = await b.acquire("edison", "t1")
        assert {first, second} == {"e1", "e2"}
        order: list[str] = []

        async def wait(holder: str) -> None:
            name = await b.acquire("edison", holder)
            order.append(holder)
            await asyncio.sleep(0.01)
            b.release(name, ok=True)

        tasks = [asyncio.create_task(wait(f"t{i}")) for i in range(2, 6)]
        await asyncio.sleep(0.01)
        assert order == []  # both devices are held: everybody waits
        b.release(first, ok=True)
        b.release(second, ok=True)
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == ["t2", "t3", "t4", "t5"]


def test_quarantine_after_repeated_failures_and_class_down_error() -> None:
    async def scenario() -> None:
        b = DeviceBroker(FLEET, quarantine_after=2, cooldown_s=60)
        for _ in range(2):
            b.release(await b.acquire("pi", "t"), ok=False, error="link cut")
        assert b.status()["p1"]["quarantined"]
        with pytest.raises(DeviceError, match=r"all devices of class 'pi' are down \(p1: link cut\)"):
            await b.acquire("pi", "t")
        with pytest.raises(DeviceError, match="no device of class 'arm'"):
            await b.acquire("arm", "t")

    asyncio.run(scenario())


def test_waiters_fail_when_the_last_device_of_their_class_is_quarantined() -> None:
    async def scenario() -> None:
        b = DeviceBroker(FLEET, quarantine_after=1)
        held = await b.acquire("pi", "t0")
        waiter = asyncio.create_task(b.acquire("pi", "t1"))
        await asyncio.sleep(0.01)
        b.release(held, ok=False, error="sshd killed")
        with pytest.raises(DeviceError, match="sshd killed"):
            await waiter

    asyncio.run(scenario())


def test_wait_timeout_and_utilisation_accounting() -> None:
    async def scenario() -> None:
        b = DeviceBroker(FLEET)
        name = await b.acquire("pi", "t0")
        with pytest.raises(DeviceError, match="within 0.05 s"):
            await b.acquire("pi", "t1", timeout_s=0.05)
        await asyncio.sleep(0.1)
        b.release(name, ok=True)
        st = b.status()["p1"]
        assert st["busy_s"] >= 0.1 and 0.5 < st["utilisation"] <= 1.0
        assert b.status()["e1"]["busy_s"] == 0.0

    asyncio.run(scenario())
