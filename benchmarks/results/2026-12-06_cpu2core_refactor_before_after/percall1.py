import sys, time, tempfile, torch, torch.distributed as dist
import flagcx
from flagcx import Communicator
torch.set_num_threads(1)
store = dist.FileStore(tempfile.mktemp(), 1)
comm = Communicator(store, 0, 1, name="w1")
x = torch.ones(2); y = torch.empty(2)
def t(fn, n=20000):
    for _ in range(500): fn()
    best = []
    for _ in range(5):
        s = time.perf_counter()
        for _ in range(n): fn()
        best.append((time.perf_counter() - s) / n * 1e6)
    return min(best)
print(flagcx.__file__.split("/")[2], comm.adapter_name("cpu"),
      "ip %.3f us" % t(lambda: comm.all_reduce(x)),
      "oop %.3f us" % t(lambda: comm.all_reduce(x, out=y)),
      "ag %.3f us" % t(lambda: comm.all_gather(y[:2], x[:2])),
      "bare shm %.3f us" % t(lambda: comm._adapter(torch.device('cpu'),'x').allreduce(x, x, flagcx.ReduceOp.SUM).wait()))
comm.destroy()
