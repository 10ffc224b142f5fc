"""flagcx-bench: an nccl-tests compatible collective bandwidth benchmark.

``flagcx-bench allreduce -b 8 -e 128M -f 2 --nproc 4`` (or ``python -m flagcx.bench``)
prints the nccl-tests table for flagcx, Gloo, NCCL or MPI, one timing loop for all.
Modules: options (flags, sizes, dtypes), colls (counts, layouts, busbw factors), data
(inputs and exact references), backends / mpi (the libraries under test), control
(the side channel that gathers timings), timing (the loop), runner (the sweep),
results (the records), report (the text layout), export (JSON / CSV / plot), sysinfo (versions, devices),
launch (spawn, torchrun, mpiexec) and cli (the entry point).
"""
