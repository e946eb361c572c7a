/* A stand-in libnccl for CPU tests (tests/distributed/test_nccl_loading.py): it exports the
 * functions fastllm's NCCL wrapper resolves, runs each op as one rank would alone on host
 * memory, records each call's arguments (fake_last_call), and fails the op named by
 * $FAKE_NCCL_FAIL with ncclInvalidUsage (5), so that error paths can be checked. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct { char internal[128]; } ncclUniqueId;
static char last_call[512];
static const size_t elem_size[] = {1, 1, 4, 4, 8, 8, 2, 4, 8, 2}; /* by ncclDataType_t */

static int fails(const char *op) {
  const char *f = getenv("FAKE_NCCL_FAIL");
  return f != NULL && strcmp(f, op) == 0;
}
static int record(const char *op, const void *send, void *recv, size_t count, int dtype, int arg, void *stream) {
  snprintf(last_call, sizeof last_call, "%s send=%p recv=%p count=%zu dtype=%d arg=%d stream=%p", op, send, recv,
           count, dtype, arg, stream);
  return fails(op) ? 5 : 0;
}
static void copy(const void *send, void *recv, size_t count, int dtype) {
  if (send != recv && dtype >= 0 && dtype < 10) memmove(recv, send, count * elem_size[dtype]);
}

const char *fake_last_call(void) { return last_call; }
int ncclGetVersion(int *v) { *v = 21903; return fails("version") ? 5 : 0; }
int ncclGetUniqueId(ncclUniqueId *id) { /* different in every process and every call */
  static int calls;
  memset(id, 0, sizeof *id);
  snprintf(id->internal, sizeof id->internal, "fake-nccl-id pid %d call %d", (int)getpid(), ++calls);
  return fails("unique_id") ? 5 : 0;
}
int ncclCommInitRank(void **comm, int n, ncclUniqueId id, int rank) {
  snprintf(last_call, sizeof last_call, "init n=%d rank=%d id=%.40s", n, rank, id.internal);
  *comm = fails("init") ? NULL : (void *)last_call;
  return fails("init") ? 5 : 0;
}
int ncclCommDestroy(void *comm) { return record("destroy", comm, NULL, 0, 0, 0, NULL); }
int ncclCommAbort(void *comm) { return record("abort", comm, NULL, 0, 0, 0, NULL); }
const char *ncclGetErrorString(int r) { return r == 5 ? "invalid usage (fake)" : "fake error"; }
const char *ncclGetLastError(void *comm) { (void)comm; return "fake detail: the op asked to fail"; }

int ncclAllReduce(const void *s, void *r, size_t n, int dt, int op, void *comm, void *stream) {
  (void)comm; copy(s, r, n, dt); return record("all_reduce", s, r, n, dt, op, stream);
}
int ncclAllGather(const void *s, void *r, size_t n, int dt, void *comm, void *stream) {
  (void)comm; copy(s, r, n, dt); return record("all_gather", s, r, n, dt, 0, stream);
}
int ncclBroadcast(const void *s, void *r, size_t n, int dt, int root, void *comm, void *stream) {
  (void)comm; copy(s, r, n, dt); return record("broadcast", s, r, n, dt, root, stream);
}
int ncclSend(const void *s, size_t n, int dt, int peer, void *comm, void *stream) {
  (void)comm; return record("send", s, NULL, n, dt, peer, stream);
}
int ncclRecv(void *r, size_t n, int dt, int peer, void *comm, void *stream) {
  (void)comm; return record("recv", NULL, r, n, dt, peer, stream);
}
