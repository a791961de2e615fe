"""The mathematics of CMD on in-memory arrays, no I/O: sampling (step 1), |corr| and
complete linkage (steps 2-4), the kernel of the streamed pass (steps 5-6) and the
running sums of online CMD. Step numbers refer to ``docs/design.md``, "The method"."""
