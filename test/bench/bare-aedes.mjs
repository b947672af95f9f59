// A bare aedes broker in its own process (for benchmark baselines): prints its port.
import { createServer } from "node:net";
import { Aedes } from "aedes";

const aedes = await Aedes.createBroker();
const server = createServer(aedes.handle);
server.listen(Number(process.argv[2] ?? 0), "127.0.0.1", () => {
  process.stdout.write(`${server.address().port}\n`);
});
