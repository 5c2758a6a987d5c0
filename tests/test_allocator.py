"""How the ``noisebench`` process sets up torch before it loads: the CPU allocator on transparent huge pages."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
PROBE = ("import os; import noisebench.cli, re, torch; x = torch.empty(16 << 20); x.fill_(1.0); "
         "print(os.environ['THP_MEM_ALLOC_ENABLE'], re.search(r'AnonHugePages:\\s+(\\d+)', "
         "open('/proc/self/smaps_rollup').read()).group(1))")


def _run(**env) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**base, **env},
                          check=True).stdout.split()


@pytest.mark.skipif(not MODE.exists() or "[madvise]" not in MODE.read_text(),
                    reason="needs Linux with transparent huge pages on request (madvise)")
def test_the_cli_puts_torch_on_huge_pages():
    """``noisebench`` sets THP_MEM_ALLOC_ENABLE before torch loads (torch reads it at its first allocation): a
    64 MB tensor then lies on huge pages, one page fault per 2 MB (fresh tensors cost the chip's CPU paths ~4x
    less); a user's own setting wins."""
    flag, huge_kb = _run()
    assert flag == "1" and int(huge_kb) >= 32 << 10, (flag, huge_kb)
    flag, huge_kb = _run(THP_MEM_ALLOC_ENABLE="0")
    assert flag == "0" and int(huge_kb) == 0, (flag, huge_kb)
