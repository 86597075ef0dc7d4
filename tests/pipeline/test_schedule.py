"""The scheduler's work slots: a target waiting for its accuracy-search turn lends its slot to a later target."""
import threading

from edgebuild.pipeline.stages.context import Turns


def test_a_target_waiting_for_its_turn_frees_its_slot_and_takes_it_back():
    slots = threading.Semaphore(1)
    turns = Turns(["onnx-cpu", "x86"], slots)
    inside = threading.Event()

    def second_target():
        with slots:  # converting: holds the only slot
            with turns.turn("x86"):  # onnx-cpu still searching: waits without the slot
                inside.set()

    t = threading.Thread(target=second_target)
    t.start()
    assert slots.acquire(timeout=10), "the waiting target kept its slot: a third target could not convert"
    assert not inside.is_set()
    slots.release()
    turns.done("onnx-cpu")
    t.join(timeout=10)
    assert inside.is_set() and not t.is_alive()
    assert slots.acquire(timeout=1)  # given back after its turn: the count is balanced


def test_the_first_target_never_waits_nor_gives_up_its_slot():
    slots = threading.Semaphore(1)
    turns = Turns(["onnx-cpu", "x86"], slots)
    with slots:
        with turns.turn("onnx-cpu"):
            assert not slots.acquire(blocking=False)
