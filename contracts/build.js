// Compile the contracts with solcjs (pinned in package.json) into artifacts/<Name>.json:
// ABI, creation and runtime bytecode, compiler version and settings.
//   npm install && npm run build   # rewrite the artifacts
//   npm run check               # exit 1 if a committed artifact differs from a fresh build
"use strict";
const fs = require("fs");
const path = require("path");
const solc = require("solc");

const SOURCES = { "FedLedger.sol": "FedLedger", "test/ReentrantClaimer.sol": "ReentrantClaimer" };
const SETTINGS = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: "cancun", // what py-evm (web3's EthereumTesterProvider) and anvil both run
  metadata: { bytecodeHash: "none" }, // no source-path-dependent hash in the bytecode
  outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
};

function compile() {
  const sources = {};
  for (const file of Object.keys(SOURCES)) {
    sources[file] = { content: fs.readFileSync(path.join(__dirname, file), "utf8") };
  }
  const out = JSON.parse(solc.compile(JSON.stringify({ language: "Solidity", sources, settings: SETTINGS })));
  const errors = (out.errors || []).filter((e) => e.severity === "error");
  for (const e of out.errors || []) console.error(e.formattedMessage);
  if (errors.length) process.exit(2);
  const artifacts = {};
  for (const [file, name] of Object.entries(SOURCES)) {
    const c = out.contracts[file][name];
    artifacts[name] = JSON.stringify({
      contractName: name,
      source: file,
      compiler: "solc " + solc.version(),
      settings: { optimizer: SETTINGS.optimizer, evmVersion: SETTINGS.evmVersion },
      abi: c.abi,
      bytecode: "0x" + c.evm.bytecode.object,
      deployedBytecode: "0x" + c.evm.deployedBytecode.object,
    }, null, 1) + "\n";
  }
  return artifacts;
}

const dir = path.join(__dirname, "artifacts");
const artifacts = compile();
if (process.argv.includes("--check")) {
  const stale = Object.keys(artifacts).filter((name) => {
    const file = path.join(dir, name + ".json");
    return !fs.existsSync(file) || fs.readFileSync(file, "utf8") !== artifacts[name];
  });
  if (stale.length) {
    console.error("stale artifacts (run `npm run build` in contracts/): " + stale.join(", "));
    process.exit(1);
  }
  console.log("artifacts up to date: " + Object.keys(artifacts).join(", "));
} else {
  fs.mkdirSync(dir, { recursive: true });
  for (const [name, text] of Object.entries(artifacts)) fs.writeFileSync(path.join(dir, name + ".json"), text);
  console.log("wrote " + Object.keys(artifacts).map((n) => "artifacts/" + n + ".json").join(", "));
}
