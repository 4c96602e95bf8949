"""The chat REPL driven through a pseudo-terminal, as a person would use it."""

import os
import pty
import select
import signal
import subprocess
import sys
import time


class Terminal:
    def __init__(self, *args):
        pid, fd = pty.fork()
        if pid == 0:  # child: the pty is its controlling terminal, so Ctrl-C becomes SIGINT
            os.execv(sys.executable, [sys.executable, "-m", "llama3.cli", "chat", *args])
        self.pid, self.fd, self.buffer = pid, fd, ""

    def read_until(self, text, timeout=180):
        end = time.time() + timeout
        while text not in self.buffer:
            left = end - time.time()
            assert left > 0, f"timed out waiting for {text!r}; screen so far:\n{self.buffer[-2000:]}"
            ready, _, _ = select.select([self.fd], [], [], min(left, 1))
            if ready:
                try:
                    self.buffer += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:
                    break
        assert text in self.buffer, self.buffer[-2000:]
        before, self.buffer = self.buffer.split(text, 1)
        return before

    def send(self, text):
        os.write(self.fd, text.encode())

    def wait(self, timeout=30):
        end = time.time() + timeout
        while time.time() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                if select.select([self.fd], [], [], 0.2)[0]:
                    os.read(self.fd, 4096)
            except OSError:
                pass
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("the chat did not exit")


def test_chat_repl_through_a_pty():
    # The exact float path, so that the expected answer does not hang on quantization near-ties.
    term = Terminal("--temperature", "0", "--max-tokens", "300", "--quantize", "none")
    term.read_until("Ctrl-D leaves")
    term.read_until("> ")
    term.send("What is the capital of France?\r")
    reply = term.read_until("> ")
    assert "Paris" in reply
    term.send("/history\r")
    shown = term.read_until("> ")
    assert "[user] What is the capital of France?" in shown and "[2 messages]" in shown

    # Ctrl-C in the middle of a long reply stops it and keeps the session
    term.send("Write a very long story about a dragon, with many chapters.\r")
    time.sleep(0.5)
    term.read_until(" ")  # the reply has started
    term.send("\x03")
    stopped = term.read_until("> ")
    assert "[stopped]" in stopped
    term.send("/history\r")
    assert "[4 messages]" in term.read_until("> ")

    term.send("/reset\r")
    assert "[history cleared]" in term.read_until("> ")
    term.send("/history\r")
    assert "[0 messages]" in term.read_until("> ")

    term.send("\x04")  # Ctrl-D leaves
    assert term.wait() == 0


def test_chat_with_a_pipe_answers_each_line_and_exits():
    out = subprocess.run([sys.executable, "-m", "llama3.cli", "chat", "-t", "0", "-n", "40", "--quantize", "none"],
                         input="Hi!\nWhat is the capital of France?\n", capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) >= 2 and "Paris" in out.stdout
