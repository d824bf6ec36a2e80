#include <prefopt/distributed-inl.h>
