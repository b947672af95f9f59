// aedes-persistence-redis ships no typings; it takes ioredis options or an ioredis connection.
declare module "aedes-persistence-redis" {
  import type { Redis, RedisOptions } from "ioredis";
  export default function persistence(
    opts?: RedisOptions & { conn?: Redis; maxSessionDelivery?: number },
  ): unknown;
}
