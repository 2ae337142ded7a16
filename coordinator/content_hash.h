// The content addresses of common/content_hash.h, as the coordinator's code names them.
#ifndef AVIARY_COORDINATOR_CONTENT_HASH_H_
#define AVIARY_COORDINATOR_CONTENT_HASH_H_

#include "common/content_hash.h"

namespace aviary::coordinator {

using common::IsSha256Hex;
using common::Sha256Hex;

}  // namespace aviary::coordinator

#endif  // AVIARY_COORDINATOR_CONTENT_HASH_H_
