import init, { SyncManager, type RecordMeta, type SyncStatus } from "../../../pkg/unified_balance.js";
async function main() {
  await init();
  const sync = new SyncManager({ hubUrl: "https://hub", siteId: "roflfaucet", userId: "8-evans", getToken: async () => "t", dataTypes: ["balance", "profile"] });
  sync.on("balance", (data: any, meta: RecordMeta) => console.log(data.coins, meta.version));
  sync.on("status", (s: SyncStatus) => console.log(s));
  sync.on("live", (live: boolean) => console.log(live));
  const fresh: boolean = await sync.login();
  sync.applyDelta("balance", { coins: -5 }, "game");
  sync.pushChanges("profile", { bio: "x" });
  const st: SyncStatus = sync.status;
  const live: boolean = sync.live;
  sync.destroy();
}
main();
